"""Adapters that run other frameworks' training code on these losses (`deepfense.losses.integrations.deepfense`)."""
