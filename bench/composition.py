"""The composition experiment (composed vs video-only vs multi-view-only sampling with the
miniature priors, and the s0 x k ablation). A thin entry point of :mod:`d2.train.experiment`:

    .venv/bin/python bench/composition.py --priors data/priors --out runs/composition [--device cuda]
"""

from d2.train.experiment import main

if __name__ == "__main__":
    main()
