"""Environment variables through which ``fcr-explorer`` tells the Streamlit script its store."""

ENV_DB = "FCR_EXPLORER_DB"
ENV_HUMAN_STUDY = "FCR_EXPLORER_HUMAN_STUDY"
