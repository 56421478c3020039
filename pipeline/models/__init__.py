"""Pi0 model family: Gemma experts, SigLIP, Pi0, energy head."""


def build_model(model_config, rngs):
  """Builds Pi0 from `config.model` (see pipeline.models.pi0.build_model)."""
  # Imported lazily so that `pipeline.models.energy` stays importable alone.
  from pipeline.models import pi0  # pylint: disable=g-import-not-at-top
  return pi0.build_model(model_config, rngs)
