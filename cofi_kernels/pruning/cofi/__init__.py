"""CoFi (Xia et al., ACL 2022): L0 gates, the Hugging Face patch, the fold into a compact model, the loop."""
