"""A model whose field default is costly: caching an instance must not re-run it."""

from django.db import models


def expensive_calculation() -> int:
    expensive_calculation.num_runs += 1  # type: ignore[attr-defined]
    return 42


expensive_calculation.num_runs = 0  # type: ignore[attr-defined]


class Poll(models.Model):
    question = models.CharField(max_length=200)
    answer = models.IntegerField(default=expensive_calculation)
