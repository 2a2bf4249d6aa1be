from choreo.vocabulary import derive_seed


def test_seeds_are_reproducible_distinct_and_in_range():
    a = derive_seed(0, "actor", 1, "env", 0)
    assert a == derive_seed(0, "actor", 1, "env", 0)
    others = {derive_seed(0, "actor", 1, "env", 1), derive_seed(0, "actor", 2, "env", 0),
              derive_seed(1, "actor", 1, "env", 0), derive_seed(0, "shard", 1)}
    assert a not in others and len(others) == 4
    assert all(0 <= s < 2**31 for s in others | {a})
