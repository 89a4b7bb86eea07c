"""Shared test code for every test package: exact oracles (`oracles`), a model stand-in with
the real encoder interface (`encoders`), the colour-square corpus as records and index
generations (`colours`), and a real server in a thread (`server`)."""
