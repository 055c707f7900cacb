"""The hybrid mask is a pure function: check it against hand-written expected matrices."""

import torch

from transfusion.attention.masks import dense_mask, hybrid_mask_mod


def _expected(rows: list[str]) -> torch.Tensor:
    return torch.tensor([[c == "x" for c in r.replace(" ", "")] for r in rows])


def test_two_documents_image_in_middle_and_padding():
    # doc 0: BOS t BOI i i i EOI t | doc 1: BOS t BOI i i EOI | PAD PAD
    doc = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, -1, -1]])
    img = torch.tensor([[-1, -1, -1, 0, 0, 0, -1, -1, -1, -1, -1, 1, 1, -1, -1, -1]])
    expected = _expected([
        "x . . . . . . . . . . . . . . .",  # BOS
        "x x . . . . . . . . . . . . . .",  # t
        "x x x . . . . . . . . . . . . .",  # BOI
        "x x x x x x . . . . . . . . . .",  # i  (sees the whole image, incl. later patches)
        "x x x x x x . . . . . . . . . .",  # i
        "x x x x x x . . . . . . . . . .",  # i
        "x x x x x x x . . . . . . . . .",  # EOI
        "x x x x x x x x . . . . . . . .",  # t
        ". . . . . . . . x . . . . . . .",  # BOS of doc 1: nothing of doc 0
        ". . . . . . . . x x . . . . . .",
        ". . . . . . . . x x x . . . . .",
        ". . . . . . . . x x x x x . . .",
        ". . . . . . . . x x x x x . . .",
        ". . . . . . . . x x x x x x . .",
        ". . . . . . . . . . . . . . x .",  # PAD: only itself
        ". . . . . . . . . . . . . . . x",
    ])
    got = dense_mask(doc, img)
    assert got.shape == (1, 16, 16)
    assert torch.equal(got[0], expected)


def test_two_images_in_one_document_do_not_see_each_others_future():
    # BOS BOI a a EOI BOI b b EOI: image a must not see image b; b sees a (earlier) and itself
    doc = torch.zeros(1, 9, dtype=torch.long)
    img = torch.tensor([[-1, -1, 0, 0, -1, -1, 1, 1, -1]])
    m = dense_mask(doc, img)[0]
    assert not m[2, 6] and not m[3, 7]
    assert m[6, 2] and m[6, 7] and m[7, 6]
    assert m[2, 3] and m[3, 2]


def test_mask_mod_matches_dense_pointwise():
    g = torch.Generator().manual_seed(0)
    doc = torch.tensor([[0] * 10 + [1] * 8 + [-1] * 2, [0] * 20])
    img = torch.full((2, 20), -1)
    img[0, 3:7] = 0
    img[0, 12:15] = 1
    img[1, 5:12] = 2
    dense = dense_mask(doc, img)
    mod = hybrid_mask_mod(doc, img)
    for _ in range(200):
        b, q, k = (int(torch.randint(0, n, (1,), generator=g)) for n in (2, 20, 20))
        got = mod(torch.tensor(b), torch.tensor(0), torch.tensor(q), torch.tensor(k))
        assert bool(got) == bool(dense[b, q, k])
    # every query row has at least one allowed key (no NaN softmax rows)
    assert dense.any(-1).all()


def test_hidden_noisy_copy_is_seen_only_by_itself():
    # BOS t BOI n n BOI c c EOI t | PAD: the noisy copy (BOI n n) is hidden span 0; the clean copy and the text after
    # it see the prefix and the clean copy only; the noisy copy sees the prefix, its BOI and its whole image
    doc = torch.tensor([[0] * 10 + [-1]])
    img = torch.tensor([[-1, -1, -1, 0, 0, -1, 1, 1, -1, -1, -1]])
    hid = torch.tensor([[-1, -1, 0, 0, 0, -1, -1, -1, -1, -1, -1]])
    expected = _expected([
        "x . . . . . . . . . .",  # BOS
        "x x . . . . . . . . .",  # t
        "x x x . . . . . . . .",  # BOI (noisy, hidden)
        "x x x x x . . . . . .",  # n: prefix + its BOI + both noisy patches
        "x x x x x . . . . . .",  # n
        "x x . . . x . . . . .",  # BOI (clean): not the noisy copy
        "x x . . . x x x . . .",  # c: both clean patches
        "x x . . . x x x . . .",  # c
        "x x . . . x x x x . .",  # EOI
        "x x . . . x x x x x .",  # t: sees the clean copy, never the noisy one
        ". . . . . . . . . . x",  # PAD
    ])
    assert torch.equal(dense_mask(doc, img, hidden_ids=hid)[0], expected)
    # without hidden ids the same row is the plain hybrid mask (the noisy copy is visible to later tokens)
    plain = dense_mask(doc, img)[0]
    assert plain[9, 3] and not torch.equal(plain, expected)
    assert torch.equal(dense_mask(doc, img, hidden_ids=torch.full_like(hid, -1)), dense_mask(doc, img))
    mod = hybrid_mask_mod(doc, img, hidden_ids=hid)
    for q in range(11):
        for k in range(11):
            assert bool(mod(torch.tensor(0), torch.tensor(0), torch.tensor(q), torch.tensor(k))) == bool(expected[q, k])
