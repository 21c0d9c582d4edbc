"""Fit VTFusion on k normal images per category and score the category's test split (the paper's protocol).

    python training/fit_vtfusion.py --config training/configs/vtfusion.yaml
    python training/fit_vtfusion.py --config ... --set model.use_fusion=false        # Table II ablations
    python training/fit_vtfusion.py --config ... --set training.anomaly_kinds=[crack] # Table III

One model per category: `hf-fsad fit --method vtfusion --normal DIR --out DIR --clip CLIP`.
"""

import sys

from hf_fsad.training.recipes import fit_main as main

if __name__ == "__main__":
    sys.exit(main(method="vtfusion"))
