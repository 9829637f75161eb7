"""The clinician's web page (Streamlit): the page script is :mod:`pneumo.app.page`, its logic :mod:`pneumo.app.support`.

Importing the package does not import Streamlit; ``pneumo app`` runs the page.
"""

from pneumo.app.support import Analysis, explain_upload, predict_upload

__all__ = ["Analysis", "explain_upload", "predict_upload"]
