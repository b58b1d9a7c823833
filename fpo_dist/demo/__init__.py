"""The bundled demo: a synthetic preference task with a known rule, its tiny reference model and SAE.

- :mod:`fpo_dist.demo.task` — the task (prompts, SFT data, preference pairs, the programmatic judge).
- :mod:`fpo_dist.demo.build_assets` — regenerates ``assets/`` (tokenizer + SFT'd tiny Llama + sae-lens SAE).
"""
