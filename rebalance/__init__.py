"""rebalance"""
