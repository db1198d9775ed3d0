"""Reading QQ NT databases: decrypt, decode message bodies, extract records."""
