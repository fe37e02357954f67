"""The Dim algebra (onnxgrow/dims.py): unify, refine into products and segments, take, cut."""

import pytest

from onnxgrow.dims import (Dim, DimConflict, atoms, cut, factors, product_of, refine, same, segments,
                           take, unify)


def test_unify_merges_symbols_and_keeps_the_known_size():
    hidden, other = Dim(None, name="hidden"), Dim(64)
    unify(hidden, other)
    assert same(hidden, other)
    assert hidden.size == other.size == 64
    third = Dim(None)
    unify(third, other)
    assert same(third, hidden) and third.size == 64


def test_unify_refuses_two_different_sizes():
    with pytest.raises(DimConflict, match="size mismatch"):
        unify(Dim(64), Dim(32))


def test_unify_refuses_two_different_roles():
    a, b = Dim(8), Dim(8)
    a.role, b.role = "heads", "head_dim"
    with pytest.raises(DimConflict, match="role mismatch"):
        unify(a, b)


def test_unify_keeps_a_role_from_either_side():
    a, b = Dim(8), Dim(8)
    b.role = "heads"
    unify(a, b)
    assert a.root().role == "heads"


def test_refine_into_a_product_gives_factors():
    hidden = Dim(64)
    heads, head_dim = refine(hidden, "prod", [4, 16])
    assert (heads.size, head_dim.size) == (4, 16)
    assert factors(hidden) == [heads, head_dim]
    assert hidden.size == 64
    # the same refinement again reuses the parts
    assert refine(hidden, "prod", [4, 16]) == [heads, head_dim]


def test_refine_refuses_a_wrong_total_and_a_second_split():
    with pytest.raises(DimConflict):
        refine(Dim(64), "prod", [3, 16])
    d = Dim(64)
    refine(d, "prod", [4, 16])
    with pytest.raises(DimConflict, match="already split"):
        refine(d, "prod", [8, 8])


def test_unify_an_atom_with_a_product_adopts_the_product():
    a = Dim(None)
    prod = product_of([Dim(4), Dim(16)])
    unify(a, prod)
    assert a.size == 64 and [f.size for f in factors(a)] == [4, 16]


def test_unify_products_aligns_their_factors():
    # (4 x 16) meets (4 x 4 x 4): the 16 is split into 4 x 4
    left = product_of([Dim(4), Dim(16)])
    right = product_of([Dim(4), Dim(4), Dim(4)])
    unify(left, right)
    assert [f.size for f in factors(left)] == [4, 4, 4]
    assert all(same(p, q) for p, q in zip(factors(left), factors(right)))


def test_a_dim_cannot_be_a_part_of_itself():
    d = Dim(None)
    with pytest.raises(DimConflict, match="part of itself"):
        unify(d, product_of([d, Dim(2)]))


def test_factors_and_atoms_flatten_nested_refinements():
    d = Dim(64)
    a, b = refine(d, "prod", [4, 16])
    refine(b, "prod", [2, 8])
    assert [f.size for f in factors(d)] == [4, 2, 8]
    fused = Dim(24)
    q, kv = refine(fused, "cat", [8, 16])
    refine(kv, "prod", [2, 8])
    assert factors(fused) == [fused]  # a concatenation is one factor
    assert [x.size for x in atoms(fused)] == [8, 2, 8]  # atoms go through both kinds


def test_take_consumes_factors_and_splits_one_when_needed():
    seq = [Dim(4), Dim(16)]
    taken, pos = take(seq, 0, 4)
    assert [t.size for t in taken] == [4] and pos == 1
    taken, pos = take(seq, 1, 4)  # 16 is split into 4 x 4, the first 4 is taken
    assert [t.size for t in taken] == [4] and pos == 2
    assert [f.size for f in seq] == [4, 4, 4]


def test_take_in_reverse_keeps_the_needed_part_on_the_right():
    d = Dim(64)
    seq = [d]
    taken, pos = take(seq, 0, 16, reverse=True)
    head, tail = refine(d, "prod", [4, 16])  # d was split as 4 x 16
    assert taken == [tail] and pos == 1


def test_take_refuses_sizes_that_do_not_align():
    with pytest.raises(DimConflict):
        take([Dim(6)], 0, 4)
    with pytest.raises(DimConflict, match="dynamic"):
        take([Dim(None)], 0, 4)
    with pytest.raises(DimConflict, match="no factors left"):
        take([Dim(2)], 0, 4)


def test_cut_makes_segment_boundaries():
    qkv = Dim(24)
    cut(qkv, 8)
    cut(qkv, 16)
    assert [s.size for s in segments(qkv)] == [8, 8, 8]
    cut(qkv, 16)  # an existing boundary changes nothing
    cut(qkv, 0)
    cut(qkv, 24)
    assert [s.size for s in segments(qkv)] == [8, 8, 8]
    assert qkv.size == 24


def test_refine_into_segments_and_unify_them_part_by_part():
    a, b = Dim(24), Dim(None)
    refine(a, "cat", [8, 16])
    refine(b, "cat", [8, 16])
    unify(a, b)
    assert all(same(p, q) for p, q in zip(segments(a), segments(b)))


def test_a_product_cannot_match_a_concatenation():
    p = product_of([Dim(4), Dim(6)])
    c = Dim(24)
    refine(c, "cat", [8, 16])
    with pytest.raises(DimConflict, match="cannot match"):
        unify(p, c)
