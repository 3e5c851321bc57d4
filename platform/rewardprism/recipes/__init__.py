"""The training recipes, in torchtune's shape (setup / train / save / cleanup), each a small file over the library's
components: `vrm` (VRM and BT reward models on Ray Train with DeepSpeed) and `drm` (embed, decompose, evaluate).
`train_vrm.py` / `rewardprism train` and `train_drm.py` run them; the Tune sweeps call them too."""
