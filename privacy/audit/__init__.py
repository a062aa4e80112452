"""Privacy audit: the data-flow inventory checks, the empirical attacks' math and the report.

* :mod:`fedpersona.privacy.audit.inventory` — verify that nothing personal left a device;
* :mod:`fedpersona.privacy.audit.canary` — canaries and their exposure (Carlini et al. 2019);
* :mod:`fedpersona.privacy.audit.onerun` — the one-run epsilon lower bound (Steinke et al. 2023);
* :mod:`fedpersona.privacy.audit.mia` — membership inference (loss and calibrated attacks);
* :mod:`fedpersona.privacy.audit.empirical` — the empirical results' file and their verdict;
* :mod:`fedpersona.privacy.audit.report` — the audit's content from plain data (ledgers, inventories);
* :mod:`fedpersona.privacy.audit.render` — ``audit.json``, ``audit.html`` (``templates/audit.html.j2``), ``audit_*.png``.

The experiment that plants canaries and runs federations is :mod:`fedpersona.simulations.audit.experiment`
(``fedpersona audit-run``); gathering a run's files is :mod:`fedpersona.simulations.audit.gather`.
"""
