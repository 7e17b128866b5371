"""Context selectors against DESIGN.md's table for every 1 <= l <= K <= 32, and the adapters."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contsup.model.network import make_adapter
from contsup.types import Source
from contsup_context import ContSup
from contsup_context.adapters import FastInputEncoder, InputEncoder, OfficialShortcutAdapter, ShortcutAdapter

X = "x"


def expected_sources(name: str, l: int) -> set[str]:
    """DESIGN.md's table, written out independently of the implementation."""
    if l == 1 or name in ("none", "R0"):
        return set()
    if name == "all":
        return {X} | {f"h{j}" for j in range(0, l - 1)}
    out = set()
    rest = name
    if rest.startswith("M"):
        i = int(rest[1])
        rest = rest[2:]
        if i == 1:
            out.add(f"h{(l - 2) // 2}")
        elif i == 2:
            out |= {f"h{(l - 2) // 3}", f"h{2 * (l - 2) // 3}"}
    if rest.endswith("E"):
        out.add(X)
        rest = rest[:-1]
    if rest.startswith("R"):
        n = int(rest[1:])
        out |= {f"h{l - 1 - i}" for i in range(1, n + 1) if l - 1 - i >= 0}
    return out


NAMES = ["none", "R0", "E", "all"] + [f"R{n}" for n in (1, 2, 3, 8, 16)] + [f"R{n}E" for n in (1, 2, 8)]
NAMES += [f"M{i}R{n}E" for i in (1, 2) for n in (1, 2)]


def selector(name: str) -> ContSup:
    return ContSup(ContSup.Options(**ContSup.resolve_name(name)))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(NAMES), st.integers(1, 32), st.data())
def test_named_selectors_match_the_design_table(name, k, data):
    l = data.draw(st.integers(1, k))
    sources = selector(name).sources(l, k)
    assert {str(s) for s in sources} == expected_sources(name, l)
    assert len(set(sources)) == len(sources)  # no source twice
    assert list(sources) == sorted(sources, key=Source.sort_key)
    for s in sources:
        assert s.is_input or 0 <= s.index <= l - 2


def test_every_module_sources_for_all_k_up_to_32():
    for name in NAMES:
        for k in range(1, 33):
            for l in range(1, k + 1):
                assert {str(s) for s in selector(name).sources(l, k)} == expected_sources(name, l), (name, l, k)


def test_options_are_the_names_long_form():
    assert ContSup.resolve_name("M1R1E") == {"input": True, "recent": 1, "intermediate": 1, "dense": False}
    assert ContSup.resolve_name("all") == {"input": True, "recent": 0, "intermediate": 0, "dense": True}
    for bad in ("", "R", "RE", "ER1", "R1EE", "M0R1E", "r1e", "R-1", "M1R01"):
        assert ContSup.resolve_name(bad) is None, bad


SHAPES = [
    ((3, 32, 32), (16, 32, 32)),
    ((3, 32, 32), (64, 8, 8)),
    ((16, 32, 32), (32, 16, 16)),
    ((16, 32, 32), (64, 8, 8)),
    ((32, 16, 16), (32, 16, 16)),
    ((1, 16, 16), (64, 4, 4)),
    ((3, 96, 96), (64, 24, 24)),
]


def _pooled(source_shape, target_shape):
    return InputEncoder(source_shape, target_shape, pool_first=True)


@pytest.mark.parametrize("source_shape, target_shape", SHAPES)
@pytest.mark.parametrize("adapter", [InputEncoder, _pooled, FastInputEncoder, ShortcutAdapter, OfficialShortcutAdapter])
def test_adapters_produce_h_shape(adapter, source_shape, target_shape):
    torch.manual_seed(0)
    out = adapter(source_shape, target_shape)(torch.randn(2, *source_shape))
    assert tuple(out.shape) == (2, *target_shape)


@pytest.mark.parametrize("source_shape, target_shape", [((16, 32, 32), (32, 16, 16)), ((16, 30, 30), (64, 7, 7)), ((8, 9, 9), (8, 4, 4))])
def test_shortcut_pools_first_with_the_same_result(source_shape, target_shape):
    torch.manual_seed(0)
    adapter = ShortcutAdapter(source_shape, target_shape)
    h = torch.randn(4, *source_shape, dtype=torch.float64)
    adapter = adapter.double()
    conv_then_pool = torch.nn.functional.adaptive_avg_pool2d(adapter.conv(h), target_shape[1:])
    assert torch.allclose(adapter(h), conv_then_pool, atol=1e-12)


def test_encoder_widths_follow_the_variant():
    paper = ContSup(ContSup.Options(input=True, encoder="paper")).adapter(Source.input(), (3, 32, 32), (64, 8, 8))
    official = ContSup(ContSup.Options(input=True, encoder="official")).adapter(Source.input(), (3, 32, 32), (64, 8, 8))
    assert paper.conv1.out_channels == 64 and official.conv1.out_channels == 12
    assert isinstance(ContSup(ContSup.Options(recent=1, shortcut="official")).adapter(Source.feature(0), (16, 8, 8), (32, 4, 4)), OfficialShortcutAdapter)


def test_faster_encoders_run_at_h_resolution():
    """"pooled" is the paper's layers on x pooled to h's size; "fast" one conv layer there."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    pooled = ContSup(ContSup.Options(input=True, encoder="pooled")).adapter(Source.input(), (3, 32, 32), (64, 8, 8))
    small = torch.nn.functional.adaptive_avg_pool2d(x, (8, 8))
    pooled.eval()
    expected = pooled.act2(pooled.bn2(pooled.conv2(pooled.act1(pooled.bn1(pooled.conv1(small))))))
    assert torch.allclose(pooled(x), expected)
    fast = ContSup(ContSup.Options(input=True, encoder="fast")).adapter(Source.input(), (3, 32, 32), (64, 8, 8))
    assert isinstance(fast, FastInputEncoder) and fast.conv.in_channels == 3 and fast.conv.out_channels == 64
    assert sum(p.numel() for p in fast.parameters()) < sum(p.numel() for p in pooled.parameters())


def test_the_paper_adapters_come_from_the_plugin_api():
    """The engine's fallback (contsup.adapters) and the plugin's re-export are the same classes."""
    import contsup.adapters
    import contsup_context.adapters as plugin

    assert plugin.InputEncoder is contsup.adapters.InputEncoder
    assert plugin.ShortcutAdapter is contsup.adapters.ShortcutAdapter
    assert plugin.paper_adapter is contsup.adapters.paper_adapter
    assert isinstance(make_adapter(object(), Source.input(), (3, 8, 8), (4, 4, 4)), contsup.adapters.InputEncoder)
    assert isinstance(make_adapter(object(), Source.feature(0), (4, 8, 8), (8, 4, 4)), contsup.adapters.ShortcutAdapter)


def test_channels_last_encoder_computes_the_same_function():
    torch.manual_seed(0)
    a = InputEncoder((3, 32, 32), (32, 16, 16), channels_last=False).double()
    b = InputEncoder((3, 32, 32), (32, 16, 16), channels_last=True).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    out_a, out_b = a(x), b(x)
    assert out_b.is_contiguous() and torch.allclose(out_a, out_b, rtol=1e-10, atol=1e-10)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-9, atol=1e-9)
    assert InputEncoder((3, 8, 8), (8, 4, 4)).channels_last is None  # on CPU, unless pooling first


@pytest.mark.parametrize("target", [(8, 16, 16), (16, 8, 8), (8, 32, 32)])
def test_channels_last_encoder_hands_its_pool_a_channels_last_gradient_and_the_same_numbers(target):
    """The encoder's output is contiguous, but the gradient going back into its pooling layer is
    channels-last like the pool's input (the plain .contiguous() would hand it a contiguous one,
    and the pool's backward would copy its full-size input gradient): the numbers are the same."""
    torch.manual_seed(0)
    encoder = InputEncoder((3, 32, 32), target, hidden=12, channels_last=True)
    x = torch.randn(4, 3, 32, 32)
    seen = []

    class Spy(torch.nn.Module):  # records the gradient reaching the pool's output
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            out = self.inner(h)
            out.register_hook(seen.append)
            return out

    encoder.pool = Spy(encoder.pool)

    def plain(m: InputEncoder) -> torch.Tensor:  # the same layers, ending in a plain .contiguous()
        h = x.contiguous(memory_format=torch.channels_last)
        h = m.act2(m.bn2(m.conv2(m.act1(m.bn1(m.conv1(h))))))
        return m.pool(h).contiguous()

    grads = []
    for run in (plain, lambda m: m(x)):
        for p in encoder.parameters():
            p.grad = None
        out = run(encoder)
        assert out.is_contiguous()
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads.append([p.grad.clone() for p in encoder.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    plain_grad, ours = seen
    assert ours.is_contiguous(memory_format=torch.channels_last) and torch.equal(ours, plain_grad)
    if target[1:] != (32, 32):  # a real pool: the plain .contiguous() hands it the other layout
        assert not plain_grad.is_contiguous(memory_format=torch.channels_last)


# -- where the adapters start ------------------------------------------------------------------------

ADAPTER_CASES = [  # (encoder, shortcut, source, the attribute of the adapter's last layer)
    ("official", "official", Source.input(), "bn2"),
    ("paper", "official", Source.input(), "bn2"),
    ("pooled", "official", Source.input(), "bn2"),
    ("fast", "official", Source.input(), "bn"),
    ("official", "official", Source.feature(0), "bn"),
    ("official", "paper", Source.feature(0), "conv"),
]


@pytest.mark.parametrize("encoder, shortcut, source, last", ADAPTER_CASES)
def test_an_adapter_starts_at_the_start_fraction_of_pytorchs_initialisation(encoder, shortcut, source, last):
    """context.start scales the adapter's last layer (a batch norm's weight, or the paper M_R's 1x1
    convolution) and nothing else; start = 1 is PyTorch's initialisation as it is."""

    def build(start):
        torch.manual_seed(0)
        options = ContSup.Options(input=True, recent=1, encoder=encoder, shortcut=shortcut, start=start)
        return ContSup(options).adapter(source, (16, 16, 16), (32, 8, 8))

    assert ContSup.Options().start == 0.1  # the default (docs/recipes.md, Defaults and why)
    plain, small = build(1.0), build(0.1)
    for (name, a), (_, b) in zip(plain.state_dict().items(), small.state_dict().items()):
        if name == f"{last}.weight":
            assert torch.allclose(b, 0.1 * a) and not torch.equal(a, b)
        else:
            assert torch.equal(a, b), name
    x = torch.randn(8, 16, 16, 16)
    plain.train(), small.train()
    ratio = small(x).abs().mean() / plain(x).abs().mean()
    assert 0.05 < ratio < 0.2  # the context it adds starts about ten times smaller


def test_a_network_with_context_starts_close_to_its_dgl_twin(registries):
    """With the adapters starting small, ContSup's final logits at initialisation are about as large
    as DGL's; at PyTorch's scale every module's context piles onto its input and they are not."""
    from conftest import small_recipe_text
    from contsup.config.recipe import loads_recipe
    from contsup.model.network import build_network

    def logit_scale(context, start=""):
        text = small_recipe_text(context=context, modules=8).replace(f'use = "{context}"', f'use = "{context}"\n{start}')
        torch.manual_seed(0)
        network = build_network(loads_recipe(text, registries, source="small.toml")).network.train()
        with torch.no_grad():
            return network(torch.randn(32, 3, 16, 16)).std().item()

    dgl, small, plain = logit_scale("none"), logit_scale("R1E"), logit_scale("R1E", "start = 1.0")
    assert small < 1.2 * dgl and plain > 1.4 * dgl  # here 0.63 and 0.93 against 0.60
