"""Callbacks for training frameworks that clip for their users (optional extras).

    # pip install gradstats[transformers]
    from gradstats.integrations.transformers import GradStatsCallback
    # pip install gradstats[lightning]
    from gradstats.integrations.lightning import GradStatsCallback

Each module imports its framework when it is imported itself; `import gradstats` imports neither.
They use gradstats' public API only.
"""
