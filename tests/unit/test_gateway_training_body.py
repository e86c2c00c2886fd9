"""The gateway's training body → the trainer's proto: a value the client sets reaches the trainer, an unset one stays
unset on the wire (so that the trainer's default applies)."""

from __future__ import annotations

from services.gateway.training import TrainingJobBody, _hyperparameters


def test_evaluate_false_reaches_the_trainer_and_unset_stays_unset() -> None:
    off = _hyperparameters(TrainingJobBody(name="views", evaluate=False, eval_fraction=0.2))
    assert off.HasField("evaluate") and off.evaluate is False and off.eval_fraction == 0.2
    default = _hyperparameters(TrainingJobBody(name="views"))
    assert not default.HasField("evaluate") and not default.HasField("eval_fraction")
