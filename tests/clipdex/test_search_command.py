"""`clipdex search` answers from the command line, ranked exactly like brute force over the
stored embeddings, as a table or as JSON."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from clipdex.main import main
from indexer.build import BuildConfig, build
from retrieval.models.inference import encode_texts
from retrieval.store import open_generation
from tests.conftest import COLOURS, make_image


@pytest.fixture(scope="module")
def index(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name, colour in COLOURS.items():
        make_image(folder / f"{name}.png", colour)
        (folder / f"{name}.txt").write_text(f"a {name} square\n")
    root = tmp_path_factory.mktemp("search-index")
    build([folder], root, tiny, BuildConfig(workers=0))
    return root, folder


def test_json_hits_are_the_exact_ranking(index, tiny, capsys):
    root, _ = index
    assert main(["search", "--index", str(root), "a red square", "--model", "clipdex-tiny",
                 "-k", "4", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    with open_generation(root) as generation:
        ids, vectors = generation.all_vectors("image")
    scores = vectors @ encode_texts(tiny, ["a red square"])[0]
    assert [hit["id"] for hit in hits] == [int(ids[i]) for i in np.argsort(-scores)[:4]]
    assert all(hit["modality"] == "image" for hit in hits)


def test_an_image_query_searches_texts_and_prints_a_table(index, capsys):
    root, folder = index
    assert main(["search", "--index", str(root), "--image", str(folder / "blue.png"), "--model",
                 "clipdex-tiny", "-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].split()[0] == "1" and "square" in lines[0]


def test_no_query_is_a_one_line_error(index, capsys):
    assert main(["search", "--index", str(index[0]), "--model", "clipdex-tiny"]) == 2
    assert "give a text query" in capsys.readouterr().err


def test_a_filter_narrows_the_hits_and_its_fields_are_shown(index, capsys):
    root, _ = index
    where = '{"field": "file_name", "in": ["red.png", "blue.png"]}'
    assert main(["search", "--index", str(root), "a green square", "--model", "clipdex-tiny",
                 "--filter", where]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all('file_name="' in line for line in lines)
    assert {line.rsplit("file_name=", 1)[1] for line in lines} == {'"red.png"', '"blue.png"'}


def test_a_bad_filter_is_a_one_line_error_naming_the_field(index, capsys):
    root, _ = index
    assert main(["search", "--index", str(root), "a dog", "--model", "clipdex-tiny",
                 "--filter", '{"field": "width", "gt": "wide"}']) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "field 'width' is number" in err
    with pytest.raises(SystemExit) as usage:
        main(["search", "--index", str(root), "a dog", "--filter", "[1]"])
    assert usage.value.code == 2 and "JSON object" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["keyword", "hybrid"])
def test_keyword_and_hybrid_modes_answer(index, mode, capsys):
    root, _ = index
    assert main(["search", "--index", str(root), "the purple one", "--model", "clipdex-tiny",
                 "--mode", mode, "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["hits"][0]
    assert top["what"].endswith("purple.png") and top["keyword_rank"] == 1


def test_order_by_gives_the_relevant_hits_oldest_first_when_asked(index, capsys):
    root, folder = index
    for day, name in enumerate(COLOURS):  # each file's modification time, a day apart
        stamp = 1_700_000_000 + 86_400 * day
        os.utime(folder / f"{name}.png", (stamp, stamp))
    rebuilt = root.parent / "dated-index"
    assert main(["index", "build", str(folder), "--out", str(rebuilt), "--model",
                 "clipdex-tiny", "--device", "cpu", "--workers", "0"]) == 0
    capsys.readouterr()
    assert main(["search", "--index", str(rebuilt), "a red square", "--model", "clipdex-tiny",
                 "-k", "8", "--json", "--order-by", "modified", "--oldest-first"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    modified = [hit["metadata"]["modified"] for hit in hits]
    assert len(hits) == 8 and modified == sorted(modified)
