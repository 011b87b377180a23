"""Training and measuring the test-bed model (``stylediffusion.testbed``'s tiny SD-shaped model).

Not part of the installed package: the package ships the trained weights
(``stylediffusion/assets/testbed_model``, ``--model testbed``) with the world, the analyser and the
architecture (``stylediffusion.testbed``); this folder is how those weights were made and measured.
Run from the repository root:

    python -m benchmarks.testbed_training.train --stage all --out checkpoints/testbed
    python -m benchmarks.testbed_training.evaluate --model-dir stylediffusion/assets/testbed_model --n 60

``train`` (the command line) runs the stages of ``stages`` (one shared loop, ``loop.TrainingStage``)
with the losses of ``losses``, writes and resumes them with ``stage_files`` and turns them into a
diffusers folder with ``export``; ``components`` loads what a stage trains against.  See docs/testbed.md.
"""
