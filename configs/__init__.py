"""Run configs: pretrain.py, dapt.py, finetune.py (installed with the package as mlmjax.configs)."""
