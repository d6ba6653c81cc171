def get_cann_version():
    """What MindSpeed reads to pick CANN-dependent paths; a stand-in answers a recent release."""
    return "8.2.RC1"
