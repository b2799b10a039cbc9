// Browser notifications for new attention items while the page is open. Permission
// is asked on a click (browsers refuse it otherwise).
import { useEffect, useState } from 'react';
import { stream } from '../api/events';
import { navigate } from './router';

export function useNotifications() {
  const supported = typeof Notification !== 'undefined';
  const [permission, setPermission] = useState<NotificationPermission>(
    supported ? Notification.permission : 'denied',
  );
  useEffect(() => {
    if (!supported) return;
    const seen = new Set<string>();
    return stream.subscribe((e) => {
      if (e.type !== 'attention.changed' || e.status !== 'pending' || seen.has(e.item)) return;
      seen.add(e.item);
      if (Notification.permission !== 'granted') return;
      const n = new Notification(`Atelier: ${e.kind}`, { body: e.title, tag: e.item, icon: '/icon-192.png' });
      n.onclick = () => {
        window.focus();
        navigate('/needs');
      };
    });
  }, [supported]);
  const ask = () => {
    if (!supported) return;
    void Notification.requestPermission().then(setPermission);
  };
  return { supported, permission, ask };
}
