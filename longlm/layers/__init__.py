"""Building blocks shared by the skeleton and the mixers."""
