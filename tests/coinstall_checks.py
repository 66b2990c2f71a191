"""Run inside the co-install venv (tests/test_coinstall.py): `python coinstall_checks.py ours|theirs|both|absent-ours`.

ours:   deepfense-losses imports from its install, trains one step, reports its metadata version.
theirs: DeepFense 0.2.2 imports its model package, builds its four losses through its registry and trains one step.
absent-ours: deepfense.losses is gone. Prints one JSON line.
"""

import json
import sys
import types

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
    try:
        import torchaudio  # noqa: F401
    except Exception:  # no torchaudio build exists for this torch: DeepFense's frontends import it at module level
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")  # and we never run those frontends
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


def absent_ours():
    try:
        import deepfense.losses  # noqa: F401
    except ImportError:
        return {"ours_absent": True}
    return {"ours_absent": False}


if __name__ == "__main__":
    out = {}
    for what in sys.argv[1:]:
        out.update({"ours": ours, "theirs": theirs, "absent-ours": absent_ours}[what]())
    print(json.dumps(out))
