"""Training of the miniature priors: data from the procedural 4D world, a small video
prior (SVD family) and a small multi-view prior (SV3D_p family), and the composition experiment.

    d2.train.data        training set rendered from the world (disjoint from the benchmark objects)
    d2.train.priors      model configs, EDM v-prediction training, ``python -m d2.train.priors``
    d2.train.experiment  composed vs video-only vs multi-view-only, and the s0 x k ablation

The ``mini`` priors backend that loads them is :func:`d2.stages.priors.build_mini`.
"""
