"""Outbound webhooks: chat tools and incident systems hear of a pause as it happens."""
