"""The curated bugs of the mutation check (`tools/mutation_check.py`): each a one-line edit (exact old -> new text in
one file) and the tests that must catch it.

Group 'core': the losses' maths, options, reductions, dtypes, kernel paths, sub-centres, fallbacks and the sharded
path. Group 'dispatch': the functional API's dispatch and the option / input validation (functional.py, inputs.py,
params.py, torch_plain.py, the modules' checks); point these at the new code whenever that is reorganised.
"""

from __future__ import annotations

from typing import NamedTuple, Tuple


class Mutant(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    tests: Tuple[str, ...]
    why: str
    group: str = "core"


O = "tests/test_options.py::"
OF, OM = O + "test_functional_options_match_oracle", O + "test_module_and_yaml_options_match_oracle"
KP = "tests/test_kernel_paths.py::"
BK = "tests/test_backends.py::"

MUTANTS = [
    # ---- options dropped by a layer ----------------------------------------------------------------------------
    Mutant("am-module-drops-m-s", "deepfense/losses/modules.py",
           "targets, m=self.m, s=self.s,", "targets,",
           (OM + "[am-reference-module]",), "AMSoftmax's module calls the functional loss with its default m and s"),
    Mutant("oc-module-drops-margins", "deepfense/losses/modules.py",
           "targets, m_real=self.m_real, m_fake=self.m_fake,", "targets,",
           (OM + "[oc-reference-module]",), "OCSoftmax's module drops m_real and m_fake"),
    Mutant("oc-module-drops-alpha", "deepfense/losses/modules.py",
           "alpha=self.alpha, bonafide_label=self.bonafide_label, **self._options())",
           "bonafide_label=self.bonafide_label, **self._options())",
           (OM + "[oc-reference-module]",), "OCSoftmax's module drops alpha alone"),
    Mutant("asoftmax-lambda-power-ignored", "deepfense/losses/modules.py",
           "** -self.lambda_power, self.lambda_min)", "** -1.0, self.lambda_min)",
           (OM + "[a-lambda-schedule-reference-module]",), "ASoftmax's lambda schedule ignores lambda_power"),
    Mutant("arcface-module-drops-fallback", "deepfense/losses/margins.py",
           "fallback=self.fallback, interclass", "interclass",
           (OM + "[arc-pml-reference-module]",), "ArcFace's module uses the default fallback"),
    Mutant("kernels-alpha-20", "deepfense/kernels/tiles.py",
           "z = alpha * tl.where(bona, m_real - cos, cos - m_fake)",
           "z = 20.0 * tl.where(bona, m_real - cos, cos - m_fake)",
           (OF + "[oc-triton-interpret]",), "the kernels' OCSoftmax alpha hard-coded to 20"),
    Mutant("kernels-bonafide-label-1", "deepfense/kernels/small_head_kernels.py",
           "cos, 0.0), 1), t_safe == bonafide, row_w,", "cos, 0.0), 1), t_safe == 1, row_w,",
           (OF + "[oc-triton-interpret]",), "the small-head kernel takes target 1 as bonafide whatever the option"),
    Mutant("kernels-m3-dropped", "deepfense/kernels/arc_margin.py",
           "return phi - tl.load(LAM + ARC_M3).to(cos.dtype)", "return phi - 0.0 * tl.load(LAM + ARC_M3).to(cos.dtype)",
           (OF + "[combined-triton-interpret]",), "CombinedMargin's m3 ignored by the kernels"),
    Mutant("kernels-filter-off", "deepfense/kernels/tiles.py",
           "return (cos > tl.where(thr > 0, thr, 2.0)) & (~is_target)", "return (cos > 2.0) & (~is_target)",
           (OF + "[combined-triton-interpret]",), "insightface's interclass filtering ignored by the kernels"),
    Mutant("torch-class-weights-dropped", "deepfense/torch_backend.py",
           "row_w = valid.to(dt) if class_weights is None else class_weights.to(dt)[safe[:, 0]] * valid",
           "row_w = valid.to(dt)", (OF + "[am-torch]",), "the torch backend ignores class weights"),
    Mutant("torch-focal-gamma-default", "deepfense/torch_backend.py",
           "(1.0 - torch.exp(-nll)).clamp_min(0.0) ** p.gamma", "(1.0 - torch.exp(-nll)).clamp_min(0.0) ** 0.5",
           (OF + "[a-lambda-schedule-torch]",), "ASoftmax's focal exponent fixed at its default"),
    Mutant("torch-straight-through-ignored", "deepfense/torch_backend.py",
           "return s + 0.0 * cos_y if p.straight_through else", "return s + 0.0 * cos_y if False else",
           (OF + "[arc-subcentres-straight-through-torch]",), "insightface's straight-through gradient ignored"),
    Mutant("kernels-smoothing-over-c-plus-1", "deepfense/kernels/tiles.py",
           "    smooth = valid.to(ACC_DTYPE) * eps / C\n", "    smooth = valid.to(ACC_DTYPE) * eps / (C + 1)\n",
           (KP + "test_class_splits[am]",), "label smoothing spread over C + 1 classes in the large-head kernels"),
    Mutant("kernels-ignore-index-ignored", "deepfense/kernels/tiles.py",
           "valid = row_mask & (t != ignore_index)", "valid = row_mask & (t != -100)",
           (OF + "[am-subcentres-large-s-triton-interpret]", OF + "[arc-speechbrain-triton-interpret]"),
           "the large-head kernels ignore only the default ignore_index"),
    # ---- the shared helpers the torch backend imports from the reference ------------------------------------
    Mutant("chebyshev-constant", "deepfense/reference.py",
           "4: lambda c: 8 * c**4 - 8 * c**2 + 1,", "4: lambda c: 8 * c**4 - 7.9 * c**2 + 1,",
           (BK + "test_matches_reference[a-C2-deepfake-torch.float32-torch]",),
           "a coefficient of T_4 in the Chebyshev helper the reference and the torch backend share"),
    Mutant("wespeaker-shift-sign", "deepfense/reference.py",
           "Fallback.WESPEAKER: 1.0 + torch.cos(math.pi - m2)", "Fallback.WESPEAKER: 1.0 - torch.cos(math.pi - m2)",
           ("tests/test_arcface.py::test_every_fallback_branch_matches_reference[wespeaker-torch.float32-torch]",),
           "WeSpeaker's fallback constant in the shared arc_margin"),
    Mutant("easy-margin-threshold", "deepfense/reference.py",
           "phi = torch.where(cos > 0, phi, cos)", "phi = torch.where(cos > 0.2, phi, cos)",
           (OF + "[arc-easy-reference]",), "easy_margin switches at cos 0.2, not 0"),
    # ---- fallbacks on the fast paths ------------------------------------------------------------------------
    Mutant("torch-fallback-grad-zero", "deepfense/torch_backend.py",
           "torch.clamp((torch.pi - m2) / m1, 0.0, torch.pi)), d, 1.0)",
           "torch.clamp((torch.pi - m2) / m1, 0.0, torch.pi)), d, 0.0)",
           (OF + "[arc-pml-torch]",), "the torch backend's gradient past ArcFace's threshold is 0, not 1"),
    Mutant("kernels-wespeaker-shift", "deepfense/kernels/arc_margin.py",
           "shift = tl.where(fb == FALLBACK_WESPEAKER, 1.0 - cm, m2 * sm)",
           "shift = tl.where(fb == FALLBACK_WESPEAKER, 1.0 + cm, m2 * sm)",
           ("tests/test_arcface.py::test_every_fallback_branch_matches_reference[wespeaker-torch.float32-triton]",),
           "WeSpeaker's fallback constant in the kernels"),
    Mutant("kernels-easy-threshold", "deepfense/kernels/arc_margin.py",
           "past = tl.where(fb == FALLBACK_EASY, c <= 0.0,", "past = tl.where(fb == FALLBACK_EASY, c <= 0.2,",
           (OF + "[arc-easy-triton-interpret]",), "easy_margin's switch point in the kernels"),
    # ---- reductions ----------------------------------------------------------------------------------------------
    Mutant("reference-mean-counts-rows", "deepfense/reference.py",
           "den = row_weight.sum()", "den = (row_weight > 0).to(row_weight.dtype).sum()",
           (OF + "[am-reference]",), "the reference's mean divides by the kept rows, not their class weights"),
    Mutant("torch-mean-counts-rows", "deepfense/torch_backend.py",
           "        den = row_w.sum()\n", "        den = (row_w > 0).to(row_w.dtype).sum()\n",
           (OF + "[am-torch]",), "the torch backend's mean divides by the kept rows"),
    Mutant("large-head-reduce-swapped", "deepfense/kernels/ops.py",
           'REDUCE = {"none": 0, "sum": 1, "mean": 2}', 'REDUCE = {"none": 0, "sum": 2, "mean": 1}',
           (KP + "test_several_forward_programs_sum_dw_partials[am-mean]",), "'sum' and 'mean' swapped (large head)"),
    Mutant("small-head-reduce-swapped", "deepfense/kernels/small_head.py",
           'REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}', 'REDUCTIONS = {"none": 0, "sum": 2, "mean": 1}',
           (OF + "[am-triton-interpret]",), "'sum' and 'mean' swapped (small head)"),
    Mutant("fused-dw-unscaled", "deepfense/kernels/ops.py",
           "g = grad if one_prog else grad * ws[N_STATS * B]", "g = grad",
           (KP + "test_several_forward_programs_sum_dw_partials[am-mean]",),
           "the one-tile forward's dW partials of several programs not scaled by the mean"),
    # ---- dtypes ----------------------------------------------------------------------------------------------------
    Mutant("torch-computes-in-16-bit", "deepfense/torch_backend.py",
           "return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32",
           "return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else tensors[0].dtype",
           (BK + "test_matches_reference", "-k", "torch and bfloat16"),
           "the torch backend computes in the inputs' 16-bit dtype instead of fp32"),
    Mutant("large-head-fp64-accumulates-fp32", "deepfense/kernels/ops.py",
           "acc = torch.float64 if dot == torch.float64 else torch.float32", "acc = torch.float32",
           (BK + "test_float64_matches_reference_tightly[am-triton]",),
           "fp64 inputs accumulated in fp32 by the large-head kernels"),
    Mutant("small-head-fp64-accumulates-fp32", "deepfense/kernels/small_head.py",
           "return torch.float64 if torch.float64 in (x.dtype, w.dtype) else torch.float32", "return torch.float32",
           (BK + "test_float64_matches_reference_tightly[oc-triton]",),
           "fp64 inputs accumulated in fp32 by the small-head kernels"),
    # ---- sub-centres -----------------------------------------------------------------------------------------------
    Mutant("reference-subcentre-mean", "deepfense/reference.py",
           "cos = cos.view(cos.shape[0], -1, sub_centers).max(2).values",
           "cos = cos.view(cos.shape[0], -1, sub_centers).mean(2)",
           (OF + "[am-subcentres-large-s-reference]",), "the reference averages sub-centres instead of taking the max"),
    Mutant("torch-subcentre-min", "deepfense/torch_backend.py",
           "best = cos_cols.view(cos_cols.shape[0], -1, k).max(2)",
           "best = cos_cols.view(cos_cols.shape[0], -1, k).min(2)",
           (OF + "[am-subcentres-large-s-torch]",), "the torch backend takes each class's farthest sub-centre"),
    Mutant("kernels-subcentre-grad-to-first", "deepfense/kernels/sub_center.py",
           "win = tl.where(take, k, win)", "win = tl.where(take, 0, win)",
           (KP + "test_sub_centres[am-2]",), "the kernels send every class's gradient to its first sub-centre"),
    # ---- the sharded path ------------------------------------------------------------------------------------------
    Mutant("sharded-mean-counts-rows", "deepfense/distributed.py",
           "            den = row_w.sum()\n", "            den = (row_w > 0).to(row_w.dtype).sum()\n",
           ("tests/test_distributed.py::test_sharded_matches_single_process[2]",),
           "the class-parallel mean divides by the kept rows"),
    Mutant("sharded-target-owner-off-by-one", "deepfense/distributed.py",
           "owned = valid & (tg >= lay.c0) & (tg < lay.c0 + n_local)",
           "owned = valid & (tg >= lay.c0) & (tg <= lay.c0 + n_local)",
           ("tests/test_distributed.py::test_sharded_matches_single_process[2]",),
           "a rank claims the first target of the next rank's slice"),
    Mutant("sharded-upstream-unscaled", "deepfense/distributed.py",
           "g = (grad * scale).expand(lay.world * lay.bmax)", "g = grad.expand(lay.world * lay.bmax)",
           ("tests/test_distributed.py::test_sharded_matches_single_process[2]",),
           "the class-parallel backward forgets the mean's scale"),
    # ---- dispatch and validation (re-point after the rewrite of these files) ----------------------------------
    Mutant("functional-am-drops-smoothing", "deepfense/functional.py",
           "label_smoothing=float(label_smoothing), reduction=reduction, sub_centers=int(sub_centers))",
           "label_smoothing=0.0, reduction=reduction, sub_centers=int(sub_centers))",
           (OF + "[am-reference]",), "am_softmax_loss drops label_smoothing", "dispatch"),
    Mutant("functional-reference-alpha-20", "deepfense/functional.py",
           "m_fake=p.m_fake, alpha=p.alpha,", "m_fake=p.m_fake, alpha=20.0,",
           (OF + "[oc-reference]",), "the 'reference' backend's OCSoftmax gets the default alpha", "dispatch"),
    Mutant("functional-arcface-drops-m1", "deepfense/functional.py",
           "m1=float(m1), m3=0.0,", "m1=1.0, m3=0.0,",
           (OF + "[combined-torch]",), "arcface_loss drops m1", "dispatch"),
    Mutant("plain-ce-drops-smoothing", "deepfense/functional.py",
           "reduction, ignore_index, float(label_smoothing))", "reduction, ignore_index, 0.0)",
           (OF + "[ce-plain-torch]",), "CrossEntropy's small-batch plain path drops label_smoothing", "dispatch"),
    Mutant("plain-oc-offset", "deepfense/torch_plain.py",
           "offset = torch.where(bona, p.alpha * p.m_real, -p.alpha * p.m_fake)",
           "offset = torch.where(bona, p.alpha * p.m_real, -p.alpha * p.m_real)",
           (OF + "[oc-plain-saturated-torch]",), "OCSoftmax's plain path uses m_real for spoof rows", "dispatch"),
    Mutant("target-range-off-by-one", "deepfense/inputs.py",
           "if lo >= 0 and hi < n_targets:", "if lo >= 0 and hi <= n_targets:",
           ("tests/test_loss_modules.py::test_bad_inputs_raise_clear_value_errors[AMSoftmax-target-too-big]",),
           "a target equal to the class count passes the value check", "dispatch"),
    Mutant("params-alpha-zero-accepted", "deepfense/params.py",
           "if self.margin == Margin.ONE_CLASS and self.alpha <= 0:",
           "if self.margin == Margin.ONE_CLASS and self.alpha < 0:",
           (O + "test_invalid_option_values_are_named",), "alpha = 0 accepted by the functional API", "dispatch"),
    Mutant("module-s-zero-accepted", "deepfense/losses/modules.py",
           'self.s = checks.check_float(name, "s", s, low=0.0, low_open=True)',
           'self.s = checks.check_float(name, "s", s, low=0.0)',
           (O + "test_invalid_option_values_are_named",), "AMSoftmax(s=0) accepted", "dispatch"),
]
