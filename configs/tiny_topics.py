"""Tiny CPU config: text-topic supervision (LDA + softmax by default; `:topics=lsa` picks
another text model) on emoji captions, after tools/fit_topics.py (see configs/common.py)."""

from configs.common import recipe


def get_config(arg=None):
    return recipe("topics", "tiny", arg)
