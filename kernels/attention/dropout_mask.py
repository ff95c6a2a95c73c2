"""The dropout-mask helpers: the keep-masks attention and attention_varlen apply, for tests and inspection. They
check what the attention function they mirror checks, and draw the seed as it draws it."""

from .api import seed_tensor
from .checks import check_cu_seqlens, check_dropout, check_seed, check_tensors
from .ops import dropout_mask


def attention_dropout_mask(q, k, dropout_p, *, seed=None):
    """The boolean keep-mask (B, H, Nq, Nk) that `attention(q, k, ..., dropout_p=dropout_p, seed=seed)` uses.

    With seed=None the seed is drawn from torch's generator exactly as `attention` draws it, so
        torch.manual_seed(s); out = attention(q, k, v, dropout_p=p)
        torch.manual_seed(s); keep = attention_dropout_mask(q, k, p)
    gives the mask of that call. Meant for tests and inspection: it materialises Nq x Nk per head.
    """
    check_tensors("attention_dropout_mask", q, k, None, ndim=4)
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    check_dropout(dropout_p, n_q, n_k)
    check_seed(seed)
    return dropout_mask(seed_tensor(dropout_p, seed, q), batch, heads, 0, n_q, n_k, dropout_p, q.device)


def attention_varlen_dropout_mask(q, k, cu_seqlens_q, cu_seqlens_k, dropout_p, *, seed=None):
    """The keep-masks `attention_varlen(q, k, ..., dropout_p=dropout_p, seed=seed)` uses: a list with one boolean
    (H, Nq_b, Nk_b) mask per sequence b. Drawn like `attention_dropout_mask`; reads the lengths on the host."""
    check_tensors("attention_varlen_dropout_mask", q, k, None, ndim=3)
    check_cu_seqlens(q, k, cu_seqlens_q, cu_seqlens_k)
    lengths_q = cu_seqlens_q.diff().tolist()
    lengths_k = cu_seqlens_k.diff().tolist()
    check_dropout(dropout_p, max(lengths_q), max(lengths_k))
    check_seed(seed)
    seed = seed_tensor(dropout_p, seed, q)
    return [dropout_mask(seed, 1, q.shape[1], b, n_q, n_k, dropout_p, q.device)[0]
            for b, (n_q, n_k) in enumerate(zip(lengths_q, lengths_k))]
