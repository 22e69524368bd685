"""Merges that use calibration data (RegMean, Chain of Merges): the data, the model run block by block, the walk."""
