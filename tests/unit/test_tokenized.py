"""Sequences tokenized once through ``datasets.map``: the same sequences as the layout builds, read back from the
Arrow cache on the next call, and a cache entry per tokenizer, layout, kind and data."""

from dataclasses import replace

import pytest

from lori_ray.data import generate_multiplication
from lori_ray.tokenized import cache_key, tokenized
from lori_ray.tokens import Layout, add_latent_tokens, arithmetic_tokenizer


def layout(latents=2):
    tokenizer = arithmetic_tokenizer()
    return Layout(tokenizer, add_latent_tokens(tokenizer, latents))


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_sequences_equal_the_layouts_and_the_second_call_reads_the_cache(kind, tmp_path):
    examples = generate_multiplication(40, 3, 2, seed=0)
    lines = []
    first = tokenized(layout(), kind, examples, tmp_path, lines.append)
    assert first == [getattr(layout(), kind)(e) for e in examples]
    path = tmp_path / f"{kind}-{cache_key(layout(), kind, examples)}.arrow"
    assert lines[0].startswith(f"[data] 40 {kind} sequences tokenized in ") and lines[0].endswith(f"cached at {path}")

    unused = layout()
    setattr(unused, kind, lambda example: pytest.fail("tokenized again"))
    again = tokenized(unused, kind, examples, tmp_path, lines.append)
    assert again == first and "read from the tokenized cache" in lines[-1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".lock") == [path.name]  # no half-written file


def test_the_key_changes_with_anything_a_sequence_depends_on():
    examples = generate_multiplication(8, 2, 2, seed=0)
    key = cache_key(layout(), "teacher", examples)
    assert key == cache_key(layout(), "teacher", list(examples))
    steps = examples[0].steps
    resplit = replace(examples[0], steps=(steps[0] + " " + steps[1], *steps[2:]))  # one text, other step bounds
    assert len({key, cache_key(layout(), "student", examples), cache_key(layout(latents=3), "teacher", examples),
                cache_key(layout(), "teacher", [resplit, *examples[1:]]), cache_key(layout(), "teacher", examples[1:]),
                cache_key(Layout(arithmetic_tokenizer()), "teacher", examples)}) == 6
    with pytest.raises(ValueError, match="kind must be one of"):
        cache_key(layout(), "teachers", examples)


def test_a_users_joiner_reaches_the_cached_sequences_and_their_key(tmp_path):
    examples = generate_multiplication(4, 2, 2, seed=0)
    joined = [replace(e, joiner=" ( ") for e in examples]
    assert len({cache_key(layout(), "teacher", examples), cache_key(layout(), "teacher", joined),
                cache_key(layout(), "teacher", [replace(e, joiner=" ) ") for e in examples])}) == 3
    assert tokenized(layout(), "teacher", joined, tmp_path, print) == [layout().teacher(e) for e in joined]
    assert tokenized(layout(), "teacher", joined, tmp_path, print) != [layout().teacher(e) for e in examples]
