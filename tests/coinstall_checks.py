"""Run inside the co-install venv (tests/test_coinstall.py): `python coinstall_checks.py WHAT...`, WHAT from:

ours:   deepfense-losses imports from its install, trains one step, reports its metadata version.
theirs: DeepFense 0.2.2 imports its model package, builds its four losses through its registry and trains one step.
adapter: use_fused_losses() in DeepFense's registry: idempotent and quiet, undone by its handle, every loss of ours
        buildable from flat keys, a detector built too early warned about and converted in place.
absent-ours: deepfense.losses is gone. Prints one JSON line.
"""

import copy
import json
import logging
import sys
import warnings

import torch


def ours():
    import deepfense.functional
    from deepfense._version import version
    from deepfense.losses import AMSoftmax, build_loss
    head = AMSoftmax(8, 3)
    emb = torch.randn(5, 8, requires_grad=True)
    head(emb, torch.tensor([0, 1, 2, 1, 0])).backward()
    multi = build_loss([{"type": "OCSoftmax", "embedding_dim": 8}, {"type": "CrossEntropy", "embedding_dim": 8}])
    assert torch.isfinite(multi(emb, torch.tensor([0, 1, 1, 0, 1]))) and emb.grad is not None
    return {"ours_file": deepfense.functional.__file__, "version": version()}


def theirs():
    import deepfense.models  # noqa: F401 - registers DeepFense's losses
    from deepfense.utils.registry import LOSS_REGISTRY
    emb = torch.randn(6, 8, requires_grad=True)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    cfgs = {"CrossEntropy": {"embedding_dim": 8, "n_classes": 2}, "AMSoftmax": {"embedding_dim": 8, "n_classes": 2,
                                                                                 "s": 30.0, "m": 0.4},
            "ASoftmax": {"embedding_dim": 8, "n_classes": 2, "m": 4},
            "OCSoftmax": {"embedding_dim": 8, "w_posi": 0.9, "w_nega": 0.2, "alpha": 20.0}}
    modules = {}
    for name, cfg in cfgs.items():
        loss = LOSS_REGISTRY.build(name, dict(cfg))
        loss(emb, y).backward()
        modules[name] = type(loss).__module__
    assert all(m.startswith("deepfense.models.losses") for m in modules.values()), modules
    return {"theirs_file": deepfense.models.__file__, "loss_modules": modules}


def adapter():
    import deepfense.models  # noqa: F401 - registers DeepFense's losses
    from deepfense.losses.integrations.deepfense import FusedArcFace, convert_losses, use_fused_losses
    from deepfense.utils.registry import LOSS_REGISTRY
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger().addHandler(handler)
    own = {n: LOSS_REGISTRY.get(n) for n in LOSS_REGISTRY.list()}
    early = torch.nn.ModuleList([LOSS_REGISTRY.build("AMSoftmax", {"embedding_dim": 8, "n_classes": 2, "s": 30.0,
                                                                   "m": 0.4}),
                                 LOSS_REGISTRY.build("ASoftmax", {"embedding_dim": 8, "n_classes": 2, "m": 4})])
    opt = torch.optim.Adam(early.parameters(), lr=0.1)
    emb, y = torch.randn(6, 8), torch.tensor([0, 1, 1, 0, 1, 0])
    for m in early:
        m(emb, y)  # ASoftmax's iter is now 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = use_fused_losses()
        again = use_fused_losses()
    late = [str(w.message) for w in caught]
    built = {n: type(LOSS_REGISTRY.build(n, {"embedding_dim": 8, "n_classes": 3, "sub_centers": 2})).__name__
             for n in ("ArcFace", "AAMSoftmax", "CombinedMargin")}
    float_loss = float(LOSS_REGISTRY.build("OCSoftmax", {"embedding_dim": 8})(emb, y.double()))
    params = [id(p) for p in early.parameters()]
    expected = [float(m(emb, y)) for m in copy.deepcopy(early)]  # DeepFense's modules' next losses
    swapped = convert_losses(early)
    after = [float(m(emb, y)) for m in early]
    early[0](emb, y).backward()
    opt.step()  # the optimizer built before the swap still updates the swapped modules' parameters
    with handle:
        pass
    restored = all(LOSS_REGISTRY.get(n) is cls for n, cls in own.items())
    with use_fused_losses() as third:
        inside = type(LOSS_REGISTRY.build("ArcFace", {"embedding_dim": 8})) is FusedArcFace
    return {"same_handle": handle is again, "late_warnings": late, "registry_log": [r.getMessage() for r in logged],
            "built": built, "float_label_loss": float_loss, "swapped": swapped,
            "swapped_types": [type(m).__name__ for m in early], "same_parameters": params == [id(p) for p in
                                                                                               early.parameters()],
            "loss_expected_converted": [expected, after], "restored": restored, "context_restored": inside and
            not third.active and all(LOSS_REGISTRY.get(n) is cls for n, cls in own.items()) and
            "ArcFace" not in LOSS_REGISTRY}


def absent_ours():
    try:
        import deepfense.losses  # noqa: F401
    except ImportError:
        return {"ours_absent": True}
    return {"ours_absent": False}


if __name__ == "__main__":
    out = {}
    for what in sys.argv[1:]:
        out.update({"ours": ours, "theirs": theirs, "adapter": adapter, "absent-ours": absent_ours}[what]())
    print(json.dumps(out))
