"""Deployment checks: systemd unit, install scripts."""
