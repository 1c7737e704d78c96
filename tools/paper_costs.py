"""The papers' cost tables, for `train.py --benchmark --against-paper` (tools/costs.py reads them).

One entry per method whose paper prints one:

    dict(title="Table IV ...", flags=[...flags of every row...],
         quantities={"params (M)": ("params_total", "absolute"), ...},
         rows=[("FCN", [...flags of the row...], {"params (M)": 47.5, ...}), ...])

A quantity is one of costs.benchmark()'s figures, read as "absolute" (ours / paper), "relative" (each
row divided by the first row, ours and the paper's: times on other hardware) or "added" (ours: each
row minus the first row; the paper's as printed, e.g. "+0.4M": the cost a module adds).
"""


# Table IV (1 x 3 x 512 x 512, ResNet-50, GA = ASPP, one V100) for --benchmark --against-paper; the
# paper's times are relative to its GA row here (ours are on other hardware), its "+0.4M" added.
GALDV2_COSTS = dict(
    title="GALD v2 Table IV: computation time and parameters, 1 x 3 x 512 x 512, ResNet-50 (deep stem), GA = ASPP",
    flags=["--backbone", "resnet50", "--stem", "deep", "--crop-size", "512", "--batch-size", "1"],
    quantities={"Param (M)": ("params_total", "absolute"), "Param added (M)": ("params_total", "added"),
                "Time": ("forward_ms", "relative"), "GFLOPs": ("gflops_forward", "absolute")},
    rows=[("GA (ASPP)", ["--ld", "none"], {"Param (M)": 47.5, "Time": 65}),
          ("FCN (Baseline)", ["--method", "fcn"], {"Time": 60}),
          ("GA + LDv1", ["--ld", "v1"], {"Param added (M)": 0.4, "Time": 70}),
          ("GA + LDv2", [], {"Param added (M)": 2.3, "Time": 82}),
          ("GA, ResNet-101", ["--ld", "none", "--backbone", "resnet101"], {"Param (M)": 65.4, "Time": 120})])


# Table V (the cost the module adds over the baseline network, 768 x 768, ResNet-101) for --benchmark
# --against-paper. Ours: the evaluation forward's GFLOPs (GR's layer3 head included, 0.36) and the
# training step's peak of live tensors (MiB; the paper's MB and way of measuring are not stated).
DENOISED_NL_COSTS = dict(
    title="Denoised NL Table V: FLOPs and memory added over the baseline, 1 x 3 x 768 x 768, ResNet-101",
    flags=["--backbone", "resnet101", "--stem", "deep", "--multi-grid", "1", "2", "4", "--crop-size", "768",
           "--batch-size", "1"],
    quantities={"GFLOPs": ("gflops_forward", "added"), "memory": ("train_step_peak_mib", "added"),
                "params (M)": ("params_total", "added")},
    rows=[("baseline (--block none)", ["--block", "none"], {}),
          ("+ NL", ["--no-global-rectifying", "--no-local-retention"], {"GFLOPs": 7.63, "memory": 407}),
          ("+ Denoised NL", [], {"GFLOPs": 7.83, "memory": 428})])


# Table 5 (512 x 512, batch 4 in training, an RTX 2080 Ti, HRNet-W48) for --benchmark --against-paper.
# Every quantity relative to the bare model (the standard single output, no context module: the
# "HRNet48" row); the paper's FPS and it/s are written as times (1000 / FPS ms), its memory in GB.
SPECIALIZE_FUSE_COSTS = dict(
    title="Specialize and Fuse Table 5: cost relative to the bare model, 512 x 512, batch 4, HRNet-W48",
    flags=["--backbone", "hrnet48", "--crop-size", "512", "--batch-size", "4"],
    quantities={"test time": ("forward_ms", "relative"), "training step time": ("train_step_ms", "relative"),
                "training memory": ("train_step_peak_mib", "relative"), "GFLOPs": ("gflops_forward", "relative")},
    rows=[("bare (HRNet48 row)", ["--output-format", "single", "--context", "none"],
           {"test time": 1000 / 28, "training step time": 1000 / 2.6, "training memory": 8.2}),
          ("+ ANL", ["--output-format", "single", "--context", "anl"],
           {"test time": 1000 / 26, "training step time": 1000 / 2.2, "training memory": 8.6}),
          ("+ ours", [], {"test time": 1000 / 24, "training step time": 1000 / 2.0, "training memory": 8.9})])


# Table 1 (Mapillary, DeepLab V3+ ResNet-50, training cost relative to single scale; V100 minibatch
# times) for --benchmark --against-paper, at 2 x 3 x 256 x 256 (the ratios do not depend on the size;
# batch 2 because the BN after the ASPP's image pooling needs more than one value per channel).
HIER_MS_ATTN_COSTS = dict(
    title="HMSA Table 1: training FLOPs and minibatch time relative to single-scale training, ResNet-50",
    flags=["--backbone", "resnet50", "--crop-size", "256", "--batch-size", "2"],
    quantities={"FLOPS": ("gflops_train_step", "relative"), "minibatch time": ("train_step_ms", "relative"),
                "peak memory (MiB)": ("train_step_peak_mib", "absolute")},
    rows=[("Single Scale", ["--ms-mode", "average"], {"FLOPS": 1.00, "minibatch time": 0.80}),
          ("Hierarchical (ours), 0.5 1.0", [], {"FLOPS": 1.25, "minibatch time": 1.17}),
          ("Explicit, 0.5 1.0 2.0", ["--ms-mode", "explicit"], {"FLOPS": 5.25, "minibatch time": 3.08})])


PAPER_COSTS = {"galdv2": GALDV2_COSTS, "denoised_nl": DENOISED_NL_COSTS, "specialize_fuse": SPECIALIZE_FUSE_COSTS,
               "hier_ms_attn": HIER_MS_ATTN_COSTS}
