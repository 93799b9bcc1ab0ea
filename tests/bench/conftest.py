"""The bench tests need the ``bench`` extra, which the ``test`` extra installs."""
