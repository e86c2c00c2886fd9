"""The gateway's training body → the trainer's proto: a value the client sets reaches the trainer, an unset one stays
unset on the wire (so that the trainer's default applies)."""

from __future__ import annotations

from services.gateway.training import TrainingJobBody, _hyperparameters, _lora


def test_evaluate_false_reaches_the_trainer_and_unset_stays_unset() -> None:
    off = _hyperparameters(TrainingJobBody(name="views", evaluate=False, eval_fraction=0.2))
    assert off.HasField("evaluate") and off.evaluate is False and off.eval_fraction == 0.2
    default = _hyperparameters(TrainingJobBody(name="views"))
    assert not default.HasField("evaluate") and not default.HasField("eval_fraction")


def test_strength_and_top_layers_reach_the_trainer_and_unset_stay_unset() -> None:
    kept = _lora(TrainingJobBody(name="views", strength=0.5, top_layers=0.5))
    assert kept.HasField("strength") and kept.strength == 0.5 and kept.top_layers == 0.5
    default = _lora(TrainingJobBody(name="views"))
    assert not default.HasField("strength") and not default.HasField("top_layers")
