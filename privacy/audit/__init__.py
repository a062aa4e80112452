"""Privacy audit: the data-flow inventory checks, the empirical attacks and the report.

* :mod:`privacy.audit.inventory` — verify that nothing personal left a device;
* :mod:`privacy.audit.canary` — canaries and their exposure (Carlini et al. 2019);
* :mod:`privacy.audit.onerun` — the one-run epsilon lower bound (Steinke et al. 2023);
* :mod:`privacy.audit.mia` — membership inference (loss and calibrated attacks);
* :mod:`privacy.audit.experiment` — ``fedpersona audit-run``: plant, train, attack;
* :mod:`privacy.audit.report` — ``fedpersona audit``: the HTML report and its JSON twin.
"""
