"""``torch.func`` transforms and forward-mode AD, as ``nn.Conv2d`` supports them: ``vmap``,
per-sample gradients (``vmap`` of ``grad``, with ``functional_call``), ``jvp``, ``jacrev``, ``jacfwd`` and
``torch.autograd.forward_ad``, on every backend.

The custom ops have no batching rule and no forward derivative: before the layer ran as ATen ops
under these transforms, ``grad``/``jacrev`` and forward AD raised on the C++ ops, and
``torch.func.jvp`` returned a zero tangent without an error on ``auto`` (``cpp``), the CPU default.
The oracle here is independent of the transforms: central differences of the reference backend
(exact up to rounding, the layer being affine in each argument) and per-sample loops of ordinary
autograd.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vmap

from coordconv_fused import CoordConv2d, CoordConvTranspose2d, coord_conv2d
from coordconv_fused.testing import Case

BACKENDS = ["reference", "torch", "cpp", "auto", "triton"]
DEVICES = ["cpu", "cuda"]

CASES = [
    Case((5, 4), batch=2, in_channels=2, out_channels=3, padding=1, with_r=True),
    Case((6, 5), batch=2, in_channels=2, out_channels=2, stride=2, padding=1, padding_mode="reflect", separate=True),
    Case((4, 4), batch=1, in_channels=4, out_channels=4, groups=2, padding=1, dilation=(2, 1)),
    Case((7,), batch=3, in_channels=2, out_channels=2, padding=1, with_r=True),
    Case((3, 4, 3), batch=1, in_channels=1, out_channels=2, kernel_size=2, padding=1),
    Case((3, 4), batch=2, in_channels=2, out_channels=3, transposed=True, stride=2, with_r=True),
]
PAIRS = [(b, c) for c in CASES for b in BACKENDS if not (c.transposed and b in ("cpp", "triton"))]
IDS = [f"{b}-{c}" for b, c in PAIRS]


def _tensors(case: Case, device: str, seed: int = 3) -> tuple[list[str], list[torch.Tensor]]:
    made = case.make_tensors(torch.float64, device, seed=seed)
    names = [n for n, t in made.items() if t is not None]
    return names, [made[n].detach() for n in names]


def _layer(case: Case, backend: str, names: list[str]):
    def fn(*args):
        return case.run(backend, dict(zip(names, args)))

    return fn


def _central_difference(case: Case, names, primals, tangents, eps: float = 1e-3) -> torch.Tensor:
    """The directional derivative by central differences of the reference backend: exact up to
    rounding, as the layer is a polynomial of degree two in its arguments (data times weight)."""
    ref = _layer(case, "reference", names)
    with torch.no_grad():
        plus = ref(*(p + eps * t for p, t in zip(primals, tangents)))
        minus = ref(*(p - eps * t for p, t in zip(primals, tangents)))
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,case", PAIRS, ids=IDS)
def test_jvp_equals_central_difference(backend, case, device):
    names, primals = _tensors(case, device)
    tangents = [torch.randn_like(p) for p in primals]
    out, tangent = jvp(_layer(case, backend, names), tuple(primals), tuple(tangents))
    with torch.no_grad():
        expected_out = _layer(case, "reference", names)(*primals)
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(tangent, _central_difference(case, names, primals, tangents), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,case", PAIRS, ids=IDS)
def test_forward_ad_equals_central_difference(backend, case, device):
    names, primals = _tensors(case, device)
    tangents = [torch.randn_like(p) for p in primals]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tangents)]
        tangent = fwAD.unpack_dual(_layer(case, backend, names)(*duals)).tangent
    assert tangent is not None, "forward AD lost the tangent"
    torch.testing.assert_close(tangent, _central_difference(case, names, primals, tangents), rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,case", PAIRS, ids=IDS)
def test_per_sample_gradients_equal_a_loop(backend, case, device):
    """``vmap(grad(loss))`` over the samples (functorch's per-sample-gradient recipe) against
    ordinary autograd on each sample with the reference."""
    names, (x, *params) = _tensors(case, device)
    probe = torch.randn_like(_layer(case, "reference", names)(x[:1], *params))

    def loss(params, sample):
        return (_layer(case, backend, names)(sample.unsqueeze(0), *params) * probe).sum()

    got = vmap(grad(loss), in_dims=(None, 0))(tuple(params), x)
    for i in range(x.shape[0]):
        leaves = [p.clone().requires_grad_() for p in params]
        out = _layer(case, "reference", names)(x[i : i + 1], *leaves)
        want = torch.autograd.grad((out * probe).sum(), leaves)
        for name, g, w in zip(names[1:], got, want):
            torch.testing.assert_close(g[i], w, rtol=1e-10, atol=1e-10, msg=lambda m, n=name, i=i: f"{n}[{i}]: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend,case", PAIRS, ids=IDS)
def test_vmap_over_inputs_and_weights_equals_a_loop(backend, case, device):
    """``vmap`` over a stack of inputs, then over a stack of parameter sets (an ensemble), as
    ``torch.func.stack_module_state`` users do."""
    names, (x, *params) = _tensors(case, device)
    fn = _layer(case, backend, names)
    ref = _layer(case, "reference", names)
    xs = torch.stack([x, 2 * x + 1, -x])
    with torch.no_grad():
        torch.testing.assert_close(
            vmap(fn, in_dims=(0, *[None] * len(params)))(xs, *params), torch.stack([ref(xi, *params) for xi in xs])
        )
        stacks = [torch.stack([p, p.flip(0), 0.5 * p]) for p in params]
        got = vmap(fn, in_dims=(None, *[0] * len(params)))(x, *stacks)
        torch.testing.assert_close(got, torch.stack([ref(x, *(s[j] for s in stacks)) for j in range(3)]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS[:4])
@pytest.mark.parametrize("transform", [jacrev, jacfwd])
def test_jacobian_transforms_equal_autograd_jacobian(transform, backend, device):
    case = CASES[0]
    names, (x, *params) = _tensors(case, device)
    x = x[:1, :, :3, :3].contiguous()
    got = transform(lambda x: _layer(case, backend, names)(x, *params))(x)
    want = torch.autograd.functional.jacobian(lambda x: _layer(case, "reference", names)(x, *params), x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


MODULE_PAIRS = [(c, b) for c in (CoordConv2d, CoordConvTranspose2d) for b in BACKENDS[:4]]
MODULE_PAIRS.remove((CoordConvTranspose2d, "cpp"))  # (no transposed C++ kernel: the layer refuses it)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer_cls,backend", MODULE_PAIRS, ids=[f"{c.__name__}-{b}" for c, b in MODULE_PAIRS])
def test_module_per_sample_gradients_with_functional_call(layer_cls, backend, device):
    """The PyTorch tutorial's recipe on the module, unbatched samples included (each sample is a
    ``[C, H, W]`` image inside ``vmap``)."""
    layer = layer_cls(2, 3, 3, padding=1, with_r=True, backend=backend).double().to(device)
    x = torch.randn(4, 2, 5, 6, dtype=torch.float64, device=device)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(params, sample):
        return functional_call(layer, params, (sample,)).square().sum()

    got = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        layer.zero_grad()
        layer(x[i]).square().sum().backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, rtol=1e-10, atol=1e-10)


def test_eager_calls_after_a_transform_keep_the_fused_op():
    """The transforms take the ATen route call by call: the plan an eager call runs is unchanged."""
    from coordconv_fused.testing import kernel_events

    x = torch.randn(2, 3, 6, 6)
    w, cw, b = torch.randn(4, 3, 3, 3), torch.randn(4, 2, 3, 3), torch.randn(4)
    vmap(lambda xi: coord_conv2d(xi, w, cw, b, padding=1, backend="cpp"))(x.unsqueeze(1))
    calls, _ = kernel_events(
        lambda: coord_conv2d(x, w, cw, b, padding=1, backend="cpp"), "coordconv_fused::coord_conv_ext"
    )
    assert calls == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_transforms_under_torch_compile(backend, device):
    """Compiled ``jvp`` and per-sample gradients: under ``torch.compile`` the CPU layer is otherwise
    the C++ op (one node), which gave a zero tangent under a compiled ``jvp``."""
    layer = CoordConv2d(2, 3, 3, padding=1, with_r=True, backend=backend).double().to(device)
    x = torch.randn(3, 2, 5, 6, dtype=torch.float64, device=device)
    t = torch.randn_like(x)
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(params, sample):
        return functional_call(layer, params, (sample,)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))
    torch._dynamo.reset()
    got = torch.compile(per_sample, backend="aot_eager")(params, x)
    want = per_sample(params, x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-10)
    _, tangent = torch.compile(lambda x, t: jvp(layer, (x,), (t,)), backend="aot_eager")(x, t)
    with torch.no_grad():
        expected = torch.nn.functional.conv2d(t, layer.weight, padding=1)  # (affine in x)
    torch.testing.assert_close(tangent, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "name", [pytest.param("coord_conv_ext", marks=pytest.mark.backend("cpp")), "coord_conv", "coord_conv_triton"]
)
def test_the_ops_called_directly_refuse_forward_ad(name):
    """The ops themselves (``coord_conv_ext``: the ``cpp`` and ``cuda`` backends'; ``coord_conv``:
    ``torch``'s; ``coord_conv_triton``) have no forward derivative: called directly under ``jvp``,
    ``jacfwd`` or forward AD they raise, where the call below autograd gave a zero or no tangent
    without a word. (The Python-registered ones cannot see ``jvp``'s tangents, so they refuse any
    call under a forward-AD level; the C++ op refuses inputs that carry a tangent.)"""
    from coordconv_fused.ops.arguments import op_arguments

    case = CASES[0]
    names, (x, w, cw, b) = _tensors(case, "cpu")
    x, args = op_arguments(x, case.spec())
    fn = getattr(torch.ops.coordconv_fused, name)

    def op(x):
        return fn(x, w, cw, b, *args)

    with pytest.raises(RuntimeError, match=f"coordconv_fused::{name} has no forward derivative"):
        jvp(op, (x,), (torch.randn_like(x),))
    with pytest.raises(RuntimeError, match="has no forward derivative"):
        jacfwd(op)(x[:1, :, :2, :2].contiguous())
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="has no forward derivative"):
        op(fwAD.make_dual(x, torch.randn_like(x)))
    if name != "coord_conv_triton":  # (Triton runs on CUDA tensors, or under TRITON_INTERPRET=1)
        op(x)  # (and without forward AD it runs)
