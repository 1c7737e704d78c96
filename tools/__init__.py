"""The extras beside the core (common.py + train.py); each module is named for what it does:

    costs.py      --benchmark, --compare-methods' table, --compile: parameters, FLOPs, memory, time
    predict.py    --predict (auto-labels, colour PNGs, pairs.txt), --save-maps heat maps, palettes
    boundary_f.py --boundary-f: the boundary F-score (GSCNN protocol, GALD v2 Table V)
    sampling.py   --class-uniform (HMSA Sec. 5.1) and --extra-data (auto-labelled images mixed in)

train.py imports them for its flags; they import common.py only (never train.py, never a method).
"""
