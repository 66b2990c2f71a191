"""DeepFense 0.2.2's own `train` and `test` commands, once on DeepFense's losses and once through `deepfense-losses
deepfense` (`run_deepfense`) on the fused ones, per loss section; prints one JSON line of what it measured.

Run inside the co-install venv (tests/test_coinstall.py::test_deepfense_cli_pipeline) with a work folder argument.
Nothing is downloaded: the data set is made here (short WAV clips, noise for spoof and noise plus a faint tone for
bonafide, listed in Parquet files as DeepFense's StandardDataset reads them), and DeepFense's own wav2vec2 frontend
(`source: fairseq`) loads a tiny checkpoint written here from its own local Wav2Vec2Model. Both runs start from one
checkpoint of DeepFense's detector (`train --resume`), read the data unshuffled and have no dropout, so they see the
same numbers; each side's best checkpoint is then tested by both sides' `test` command.
"""

import glob
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import yaml

from deepfense.cli.main import cli  # DeepFense's command line
from deepfense.models.modules.fairseq_local.loader import _parse_model_cfg
from deepfense.models.modules.fairseq_local.models import Wav2Vec2Model
from deepfense.utils.registry import build_detector

from deepfense.losses.integrations.deepfense import run_deepfense, use_fused_losses

SR, SAMPLES, DIM = 16000, 2000, 32  # 1/8 s clips; the embedding size the losses see
FRONTEND = dict(conv_feature_layers="[(16, 10, 5)] + [(16, 3, 2)] * 3", encoder_embed_dim=16,  # 49 frames a clip
                encoder_layers=1, encoder_ffn_embed_dim=32, encoder_attention_heads=2, conv_pos=8, conv_pos_groups=2)
SECTIONS = {  # DeepFense's four loss types (its ASoftmax cannot be the first loss: its forward takes no logits)
    "CrossEntropy+AMSoftmax": [  # config/train.yaml's section
        {"type": "CrossEntropy", "weight": 0.5, "embedding_dim": DIM, "n_classes": 2, "class_weights": [0.1, 0.9]},
        {"type": "AMSoftmax", "weight": 0.5, "embedding_dim": DIM, "n_classes": 2, "s": 30.0, "m": 0.4}],
    "AMSoftmax+ASoftmax": [
        {"type": "AMSoftmax", "weight": 1.0, "embedding_dim": DIM, "n_classes": 2, "s": 30.0, "m": 0.4},
        {"type": "ASoftmax", "weight": 0.5, "embedding_dim": DIM, "n_classes": 2, "m": 4}],
    "OCSoftmax": [{"type": "OCSoftmax", "weight": 1.0, "embedding_dim": DIM, "w_posi": 0.9, "w_nega": 0.2,
                   "alpha": 20.0}],
}
OURS_ONLY = {  # no DeepFense class: the fused side alone, with sub-centres and the margin ramp
    "ArcFace(sub_centers=2, margin ramp)": [
        {"type": "ArcFace", "embedding_dim": DIM, "n_classes": 2, "m": 0.0, "s": 30.0, "sub_centers": 2,
         "final_margin": 0.2, "increase_start_iter": 2, "fix_start_iter": 6}],
    "CombinedMargin": [{"type": "CombinedMargin", "embedding_dim": DIM, "n_classes": 2, "m1": 1.0, "m2": 0.3,
                        "m3": 0.1, "s": 30.0}],
}


def make_data(root: Path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("val", 32), ("test", 48)):
        rows = []
        for i in range(n):
            label = "bonafide" if i % 2 else "spoof"
            x = rng.uniform(0.05, 0.3) * rng.standard_normal(SAMPLES)  # noise of random loudness
            if label == "bonafide":
                x += rng.uniform(0.1, 0.3) * np.sin(2 * np.pi * rng.uniform(300, 3000) * np.arange(SAMPLES) / SR)
            path = root / "wav" / f"{split}_{i:03d}.wav"
            sf.write(path, x.astype(np.float32), SR)
            rows.append({"ID": f"{split}_{i:03d}", "path": str(path), "label": label})
        pd.DataFrame(rows).to_parquet(root / f"{split}.parquet")


def make_frontend(path: Path):
    """A tiny fairseq-format wav2vec2 checkpoint, read by DeepFense's own loader."""
    torch.manual_seed(0)
    state = {"cfg": {"model": FRONTEND}}
    torch.save({**state, "model": Wav2Vec2Model(**_parse_model_cfg(state)).state_dict()}, path)


def config(root: Path, section, out: Path) -> Path:
    split = lambda name, batch: {"dataset_type": "StandardDataset", "dataset_names": ["synthetic"],  # noqa: E731
                                 "parquet_files": [str(root / f"{name}.parquet")], "batch_size": batch,
                                 "shuffle": False}
    cfg = {"exp_name": "run", "output_dir": str(out), "seed": 42,
           "data": {"sampling_rate": SR, "label_map": {"bonafide": 1, "spoof": 0}, "train": split("train", 16),
                    "val": split("val", 32), "test": split("test", 48)},
           "model": {"type": "StandardDetector",
                     "frontend": {"type": "wav2vec2", "args": {"source": "fairseq",
                                                               "ckpt_path": str(root / "frontend.pt")}},
                     "backend": {"type": "MLP", "args": {"input_dim": 16, "projection": [DIM],
                                                         "pooling_type": "mean"}},
                     "loss": section},
           "training": {"trainer": "StandardTrainer", "epochs": 3, "device": "cpu", "eval_every_epochs": 1,
                        "monitor_metric": "loss", "monitor_mode": "min", "output_dir": str(out),
                        "optimizer": {"type": "adam", "lr": 0.01}, "metrics": {"EER": {}}}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg))
    return out / "config.yaml"


def deepfense_own():
    """DeepFense's own losses back in its registry (restoring the registration run_deepfense left in force)."""
    use_fused_losses().restore()


def theirs(args):
    deepfense_own()
    try:
        cli.main(args=args, prog_name="deepfense", standalone_mode=True)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def train(run, cfg: Path, init: Path) -> dict:
    assert run(["train", "-c", str(cfg), "--resume", str(init)]) == 0
    exp = Path(glob.glob(str(cfg.parent / "run_*"))[0])
    evals = sorted(exp.glob("results/metrics_epoch*_step*.json"))
    return {"dir": exp, "val": [json.loads(p.read_text()) for p in evals]}


def test(run, cfg: Path, ckpt: Path, where: Path) -> dict | None:
    """`test` on a copy of `ckpt` in `where`; None when the command could not load the checkpoint."""
    where.mkdir(parents=True)
    shutil.copy(ckpt, where / "best_model.pth")
    assert run(["test", "-c", str(cfg), "-ckpt", str(where / "best_model.pth")]) == 0
    results = where / "results.json"  # DeepFense's test logs a failed load and returns without writing it
    return json.loads(results.read_text()) if results.exists() else None


def step_time(cfg: Path, fused: bool, steps: int = 6) -> float:
    """Median seconds of one training step (forward, loss, backward, Adam) of the detector on one batch of 16."""
    model_cfg = yaml.safe_load(cfg.read_text())["model"]
    handle = use_fused_losses()
    if not fused:
        handle.restore()
    torch.manual_seed(0)
    det = build_detector("StandardDetector", model_cfg)
    handle.restore()
    opt = torch.optim.Adam(det.parameters(), lr=1e-3)
    x, y = torch.randn(16, SAMPLES), torch.arange(16) % 2
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        opt.zero_grad()
        det.compute_loss(det(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def compare(root: Path, name: str, section) -> dict:
    work = root / name.split("(")[0]
    init = work / "init.pth"
    cfg = {side: config(root, section, work / side) for side in ("ours", "theirs")}
    init.parent.mkdir(parents=True, exist_ok=True)
    if name in SECTIONS:  # DeepFense's own detector and losses make the starting checkpoint both runs resume from
        deepfense_own()
        torch.manual_seed(0)
        det = build_detector("StandardDetector", yaml.safe_load(cfg["theirs"].read_text())["model"])
    else:
        with use_fused_losses():
            torch.manual_seed(0)
            det = build_detector("StandardDetector", yaml.safe_load(cfg["ours"].read_text())["model"])
    torch.save({"model_state": det.state_dict(), "epoch": 0, "step": 0}, init)
    runs = {"ours": run_deepfense}
    if name in SECTIONS:
        runs["theirs"] = theirs
    out, trained = {}, {}
    for side, run in runs.items():
        start = time.perf_counter()
        trained[side] = train(run, cfg[side], init)
        out[f"train_s_{side}"] = round(time.perf_counter() - start, 2)
        out[f"step_s_{side}"] = step_time(cfg[side], fused=side == "ours")
    for side in runs:  # each side's best checkpoint through each side's `test`
        for tester in runs:
            best = trained[side]["dir"] / "best_model.pth"
            res = test(runs[tester], cfg[tester], best, work / f"{tester}_tests_{side}")
            out[f"test_{tester}_on_{side}"] = res and {"loss": res["loss"], "EER": res["EER"]}
    out["val_ours"] = [(r["loss"], r["EER"]) for r in trained["ours"]["val"]]
    if "theirs" in runs:
        out["val_theirs"] = [(r["loss"], r["EER"]) for r in trained["theirs"]["val"]]
        out["val_loss_rel_diff"] = max(rel(a[0], b[0]) for a, b in zip(out["val_ours"], out["val_theirs"]))
        t_ours, t_theirs = out["test_ours_on_ours"], out["test_theirs_on_theirs"]
        out["test_loss_rel_diff"] = rel(t_ours["loss"], t_theirs["loss"])
    return out


def main():
    torch.set_num_threads(1)  # steadier step times on a shared machine
    root = Path(sys.argv[1])
    (root / "wav").mkdir(parents=True)
    make_data(root)
    make_frontend(root / "frontend.pt")
    out = {name: compare(root, name, section) for name, section in {**SECTIONS, **OURS_ONLY}.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
