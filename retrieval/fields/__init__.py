"""What an item's metadata fields hold and how a filter speaks about them: value types
(`values`) and the filter language (`filters`). The store, the inputs and the searcher all
read fields, so this package sits at the bottom and imports nothing else of clipdex's."""
