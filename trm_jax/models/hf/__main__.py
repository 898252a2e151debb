"""`python -m trm_jax.models.hf export --workdir=W --out=O`: the historical name of `python -m trm_jax.export`."""
from trm_jax import export

if __name__ == "__main__":
  export.main(prog="python -m trm_jax.models.hf")
