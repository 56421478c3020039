"""XManager launcher for Cloud TPU VMs (own virtual environment)."""
