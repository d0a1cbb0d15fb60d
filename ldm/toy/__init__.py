"""The default model's world: procedural captioned images, the judge classifier that scores
generated ones, the evaluation recipe, the crescent-moon new-concept data, and the shipped assets
(``default_model/``, ``judge_model/``).

Only the default model and its recipe need this room; Stable Diffusion users never import it.
"""
