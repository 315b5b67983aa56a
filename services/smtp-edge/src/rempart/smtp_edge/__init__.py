"""The SMTP edge: MX (25), submission (587) and SMTPS (465) listeners on aiosmtpd."""
