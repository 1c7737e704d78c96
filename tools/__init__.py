"""The extras beside the core (common.py + train.py); each module is named for what it does:

    costs.py      --benchmark, --compare-methods' table, --compile: parameters, FLOPs, memory, time
    predict.py    --predict (auto-labels, colour PNGs, pairs.txt), --save-maps heat maps, palettes
    boundary_f.py --boundary-f: the boundary F-score (GSCNN protocol, GALD v2 Table V)
    sampling.py   --class-uniform (HMSA Sec. 5.1) and --extra-data (auto-labelled images mixed in)
    levels.py     --levels: S&F Table 9, the share of pixels each pyramid level predicts
    paper_costs.py  the papers' cost tables that --against-paper measures beside
    carried_flags.py the flags a checkpoint carries: what --resume, --eval-only, --predict take from it
    crash_safety.py atomic writes, the run folder's lock, SIGTERM / SIGINT, finite-state checks
    convert_nvidia.py  NVIDIA's released HMSA checkpoints -> this project's keys (run as a script)
    check_data.py --check-data: every image and label of a dataset read once, counted per split
    progress.py   one progress line (n of N, rate, ETA) for every long wait
    gpu_check.py  the CUDA paths in one timed call (python -m tools.gpu_check --help; --dry-run on a CPU)

train.py imports them for its flags; they import common.py only (never train.py, never a method).
"""
