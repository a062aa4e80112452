"""The empirical privacy audit: the canary experiment, gathering a run's records, the ``fedpersona audit`` commands."""
