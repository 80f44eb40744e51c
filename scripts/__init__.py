"""Programs that build the embedded models: training and model cards. They use the library; the library
never imports them. Run from the repository root, e.g. `python -m scripts.train_smolvlm --out runs/smolvlm`."""
