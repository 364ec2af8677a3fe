"""Analysis: ΔW spectra, intruders, matched learning, LR scaling, figures and the analyze stage."""
