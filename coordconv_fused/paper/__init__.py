"""The paper's toy experiments (Liu et al. 2018, Section 4 and supplement S1–S4) on our layers.

``data`` builds Not-so-Clevr; ``models`` has the CoordConv models and the convolution /
deconvolution baselines; ``train`` runs a task and reports; the CLI is ``coordconv-fused paper``.
"""
