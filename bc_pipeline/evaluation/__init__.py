"""Stage 5, evaluation and reporting: metrics and the Markdown report (``metrics``, ``report``), one
model scored end to end (``evaluate``), the ImageNet-C benchmark (``imagenet_c``), TTA and Grad-CAM
(``interpret``), the leaderboard, the submission package and ``bc-predict`` (``predict``)."""
