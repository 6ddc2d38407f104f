"""Generic FX graph passes for attention: find softmax-attention sites, classify their masks, and
replace a site with any callable that has the signature of F.scaled_dot_product_attention.
Knows FX graphs and nothing about how the replacement computes attention.

    sites = find_attention_sites(gm)
    for site in sites:
        if site.supported:
            replace_attention_site(gm, site, torch.nn.functional.scaled_dot_product_attention)

Where things live:
    graph_walk.py       the spellings of each operation (tables), reading node arguments and metadata
    attention_sites.py  the dataflow matcher, AttentionSite and its replacement plan
    masks.py            none / causal / key_padding / general, proven by computing constant masks
    constants.py        which values depend only on constants and sizes, and computing them
    escape.py           intermediate values used outside a site; convexity (networkx)
    head_repeat.py      repeated key/value heads (GQA/MQA written out)
    einsum_layout.py    einsum equations read as attention layouts
    replace.py          emitting the call and removing the site
"""

from passes.attention_sites import AttentionSite, find_attention_sites
from passes.replace import replace_attention_site

__all__ = ["AttentionSite", "find_attention_sites", "replace_attention_site"]
